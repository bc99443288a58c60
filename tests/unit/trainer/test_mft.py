"""regularizer.mft, corrective targets on the stage's own tokens (trainer/forgetting/mft.py): the
corrected target against one built directly over the whole vocabulary, the KL to it through the
chunked head and its gradients (1e-5), τ = 1 as plain cross-entropy, the stored top-k always holding
the label, the per-micro-batch targets, and the config's refusals. On 2 ZeRO-3 ranks (stored targets
against full logits, step-1 loss, resume): tests/distributed/test_training.py."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from trainer.cli import load_config
from trainer.forgetting.mft import CorrectedTargets, rows_needed
from trainer.objectives.distill import corrected_targets, sparse_kl, topk_logprobs

IGNORE = -100
BASE = ["+exp=medical_qa", "output_dir=/tmp/x"]


def _case(vocab: int = 40, hidden: int = 10, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(2, 9, hidden, generator=g, dtype=torch.float64)
    w = torch.randn(vocab, hidden, generator=g, dtype=torch.float64) * 0.5
    logq_all = torch.log_softmax(torch.randn(2, 9, vocab, generator=g, dtype=torch.float64) * 4, -1)
    labels = torch.randint(0, vocab, (2, 9), generator=g)
    labels[1] = logq_all[1].argmax(-1)  # the start's own choice: often already above τ
    labels[0, :2] = IGNORE
    return h, w, logq_all, labels


def _direct_target(logq_all: torch.Tensor, labels: torch.Tensor, tau: float) -> torch.Tensor:
    """The corrected target over the whole vocabulary, written out: y raised to τ where q_y < τ, the
    other tokens scaled to share 1 − τ in their old proportions."""
    q = logq_all.exp()
    t = q.clone()
    for i in range(labels.shape[0]):
        for j in range(labels.shape[1]):
            y = int(labels[i, j])
            if y == IGNORE or q[i, j, y] >= tau:
                continue
            t[i, j] = q[i, j] * (1 - tau) / (1 - q[i, j, y])
            t[i, j, y] = tau
    return t


@pytest.mark.parametrize("tau", [0.3, 0.7])
def test_with_the_whole_vocabulary_the_target_and_the_kl_are_the_direct_ones(tau):
    h, w, logq_all, labels = _case()
    vocab = w.shape[0]
    ids = torch.arange(vocab).expand(2, 9, vocab)
    target = _direct_target(logq_all, labels, tau)
    ours = corrected_targets(ids, logq_all.float(), labels, tau)
    assert torch.allclose(ours.double().exp(), target, atol=1e-6)
    assert torch.allclose(ours.double().exp().sum(-1), torch.ones(2, 9, dtype=torch.float64), atol=1e-5)
    raised = (logq_all.exp().gather(-1, labels.clamp_min(0)[..., None])[..., 0] < tau) & (labels != IGNORE)
    assert 0 < int(raised.sum()) < int((labels != IGNORE).sum())  # both cases occur

    mask = labels != IGNORE
    ref_h, ref_w = h.clone().requires_grad_(), w.clone().requires_grad_()
    logp_all = torch.log_softmax(ref_h @ ref_w.T, -1)
    ref = torch.where(mask, (target * (target.clamp_min(1e-300).log() - logp_all)).sum(-1), 0.0)
    upstream = torch.rand(ref.shape, dtype=torch.float64)
    (ref * upstream).sum().backward()
    our_h, our_w = h.float().clone().requires_grad_(), w.float().clone().requires_grad_()
    kl = sparse_kl(our_h, our_w, ids, ours, mask, chunk=5)
    (kl * upstream.float()).sum().backward()
    assert torch.allclose(kl.double(), ref, atol=1e-5)
    assert torch.allclose(our_h.grad.double(), ref_h.grad, atol=1e-5)
    assert torch.allclose(our_w.grad.double(), ref_w.grad, atol=1e-5)


def test_tau_one_is_plain_cross_entropy_and_a_confident_start_is_its_own_target():
    h, w, logq_all, labels = _case()
    mask = labels != IGNORE
    ids, logq = topk_logprobs(h.float().reshape(-1, 10), w.float(), 6, targets=labels.reshape(-1).clamp_min(0))
    ids, logq = ids.view(2, 9, 6), logq.view(2, 9, 6)
    one_hot = corrected_targets(ids, logq, labels, 1.0)
    our_h = h.float().clone().requires_grad_()
    kl = sparse_kl(our_h, w.float(), ids, one_hot, mask, chunk=4)
    kl.sum().backward()
    ref_h = h.float().clone().requires_grad_()
    ce = F.cross_entropy((ref_h @ w.float().T).reshape(-1, 40), labels.reshape(-1), reduction="none").view(2, 9)
    ce.sum().backward()
    assert torch.allclose(kl, torch.where(mask, ce, 0.0), atol=1e-5)
    assert torch.allclose(our_h.grad, ref_h.grad, atol=1e-5)
    # where the start gives the label at least τ (here τ tiny) the target is the start itself: KL 0 for it
    same = corrected_targets(ids, logq, labels, 1e-9)
    assert torch.equal(same, logq)
    assert float(sparse_kl(h.float(), w.float(), ids, same, mask).abs().max()) < 1e-5


def test_the_stored_top_k_always_hold_the_label_with_its_exact_log_prob():
    h, w, _, labels = _case()
    flat, targets = h.float().reshape(-1, 10), labels.reshape(-1).clamp_min(0)
    plain_ids, plain_logp = topk_logprobs(flat, w.float(), 4, chunk=7)
    ids, logp = topk_logprobs(flat, w.float(), 4, chunk=7, targets=targets)
    logp_all = torch.log_softmax(flat @ w.float().T, -1)
    assert bool((ids == targets[:, None]).any(1).all())
    assert torch.allclose(logp, logp_all.gather(1, ids), atol=1e-5)
    inside = (plain_ids == targets[:, None]).any(1)
    assert 0 < int(inside.sum()) < len(targets)  # both cases occur
    assert torch.equal(ids[inside], plain_ids[inside]) and torch.equal(ids[~inside, :3], plain_ids[~inside, :3])
    # the non-chunked path (full logits) stores the same
    ids2, logp2 = topk_logprobs(flat @ w.float().T, None, 4, targets=targets)
    assert torch.equal(ids2, ids) and torch.allclose(logp2, logp, atol=1e-5)


class _Inner:
    """A StepLoader's interface: one micro-batch of two rows, one from each source, cut to width 5."""

    rows_per_step = 2

    def __init__(self, labels: torch.Tensor, rows) -> None:
        self.labels, self.rows_of = labels, rows

    def micro_batches(self, step):
        return [{"labels": self.labels.clone(), "source": torch.tensor([1, 0]), "row": torch.tensor(self.rows_of)}]

    def rows(self, step):
        return [[(1, self.rows_of[0]), (0, self.rows_of[1])]]


def test_each_micro_batch_gets_the_targets_of_its_own_rows_and_sources():
    g = np.random.default_rng(0)
    teachers = []
    for stored in ([3, 5, 9], [2, 7]):  # the rows stored per source; 4 positions of width 7, top 3
        ids = g.integers(0, 30, (len(stored), 7, 3)).astype(np.int32)
        teachers.append((np.asarray(stored), ids, np.log(np.full((len(stored), 7, 3), 0.2, dtype=np.float32))))
    labels = torch.full((2, 5), IGNORE)
    labels[0, 1:] = torch.from_numpy(teachers[1][1][1, :4, 0])  # row 7 of source 1 (slot 1): the label is slot 0
    labels[1, 1:] = torch.from_numpy(teachers[0][1][2, :4, 2])  # row 9 of source 0 (slot 2)
    source = CorrectedTargets(_Inner(labels, [7, 9]), teachers, tau=0.5, names=["main", "replay"])
    (batch,) = source.micro_batches(0)
    assert torch.equal(batch["target_ids"][0], torch.from_numpy(teachers[1][1][1, :4]).long())
    assert torch.equal(batch["target_ids"][1], torch.from_numpy(teachers[0][1][2, :4]).long())
    q = batch["target_logp"].exp()
    assert torch.allclose(q[0, :, 0], torch.full((4,), 0.5)) and torch.allclose(q[1, :, 2], torch.full((4,), 0.5))
    assert torch.allclose(q[0, :, 1], torch.full((4,), 0.2 * 0.5 / 0.8))  # (1 − τ)/(1 − q_y)
    assert source.rows(0) == [[(1, 7), (0, 9)]] and source.rows_per_step == 2
    # a row the start's pass did not cover (a resume laid the stream out otherwise) stops, naming it
    missing = CorrectedTargets(_Inner(labels, [7, 4]), teachers, tau=0.5, names=["main", "replay"])
    with pytest.raises(RuntimeError, match="row 4 of source main has no stored target: .* the 3 rows its steps"):
        missing.micro_batches(0)


def test_the_rows_needed_are_those_the_steps_visit():
    class Src:
        def __init__(self, n):
            self.filled = np.full(n, 10)

    one = rows_needed([Src(50)], [1.0], 1234, 8)
    assert len(one) == 1 and len(one[0]) == 8 and set(one[0]) <= set(range(50))
    assert len(rows_needed([Src(5)], [1.0], 1234, 12)[0]) == 5  # past an epoch: every row, once
    two = rows_needed([Src(40), Src(40)], [0.75, 0.25], 1234, 16)
    assert (len(two[0]), len(two[1])) == (12, 4)


def test_the_config_refuses_what_cannot_work():
    assert not load_config(BASE).regularizer.mft.enabled
    cfg = load_config(BASE + ["regularizer.mft.tau=0.5"])
    assert cfg.regularizer.mft.enabled and cfg.regularizer.mft.top_k == 32
    for bad in ("0", "1.5", "-0.1"):
        with pytest.raises(SystemExit, match=rf"regularizer.mft.tau={float(bad)}: .* in \(0, 1\]"):
            load_config(BASE + [f"regularizer.mft.tau={bad}"])
    with pytest.raises(SystemExit, match="regularizer.mft.top_k=1: must be >= 2"):
        load_config(BASE + ["regularizer.mft.tau=0.5", "regularizer.mft.top_k=1"])
    with pytest.raises(SystemExit, match=r"regularizer.mft.tau=0.5 with stage=dpo"):
        load_config(["stage=dpo", "data=medical_prefs", "output_dir=/tmp/x", "regularizer.mft.tau=0.5"])
