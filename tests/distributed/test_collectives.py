"""The distributed tier in process: 2 real gloo ranks (inprocess.run_distributed) for what needs a
process group but not a training run: the all-reduces, the checkpointer on a real ZeRO-3 engine, and
EWC on real ZeRO-3 shards. A call costs about a second plus a second or two per engine it builds,
where a launch of the whole trainer costs 20-40 s; what only a whole run shows (launchers, the loop,
metrics, export) stays in the run tests.

The engine is the trainer's own (trainer.engine.model.build_model under ZeRO-3, trainer.engine.optim's AdamW and
schedule, trainer.engine.deepspeed_config's config) around a tiny random Llama. Two runs are compared bit
for bit only where they compute identically: the same ranks, one thread each (inprocess sets it),
the same collectives on the same sizes. 1 rank against 2 adds the gradients in another order, so
those comparisons state a tolerance.
"""

from __future__ import annotations

import signal

import pytest
import torch
from inprocess import DistributedFailure, run_distributed

pytestmark = pytest.mark.distributed

ARCH = dict(
    vocab_size=64,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
)
SEQ = 16
ROWS = 4  # rows of one global batch: 2 per rank on 2 ranks, all 4 on 1 rank


# ---- all_reduce_sum, all_gather_object ------------------------------------------------------------


def _collectives(rank, world):
    from trainer import distributed

    values = torch.tensor([1.0 + rank, 10.0 * (rank + 1)], dtype=torch.float64)
    summed = distributed.all_reduce_sum(values)
    return {
        "in_place": summed is values,
        "sum": values.tolist(),
        "gathered": distributed.all_gather_object({"rank": rank, "files": [f"rng_rank{rank}.pt"]}),
        "world": distributed.world_size(),
        "threads": torch.get_num_threads(),
    }


def test_all_reduce_sum_and_all_gather_object_on_two_ranks():
    for rank, got in enumerate(run_distributed(_collectives, 2)):
        assert got["in_place"], rank
        assert got["sum"] == [1.0 + 2.0, 10.0 + 20.0]
        assert got["gathered"] == [{"rank": 0, "files": ["rng_rank0.pt"]}, {"rank": 1, "files": ["rng_rank1.pt"]}]
        assert got["world"] == 2 and got["threads"] == 1


def test_on_one_rank_and_without_a_group_all_gather_object_is_the_object_alone(monkeypatch):
    (got,) = run_distributed(_collectives, 1)
    assert got["sum"] == [1.0, 10.0] and got["gathered"] == [{"rank": 0, "files": ["rng_rank0.pt"]}]
    assert got["world"] == 1

    from trainer import distributed

    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: False)  # e.g. a tool run outside a job
    assert distributed.all_gather_object({"a": 1}) == [{"a": 1}] and distributed.world_size() == 1


# ---- a tiny ZeRO-3 engine, built as the trainer builds it ------------------------------------------


class _Vocab:
    """What build_model needs of a tokenizer: its length (to resize embeddings for added tokens)."""

    def __len__(self) -> int:
        return ARCH["vocab_size"]


def _engine(world: int, seed: int = 0):
    import deepspeed
    from transformers import LlamaConfig

    from trainer.config import DeepSpeedConfig, ModelConfig, OptimConfig, ScheduleConfig, TrainerConfig
    from trainer.engine.deepspeed_config import build_deepspeed_config
    from trainer.engine.model import build_model
    from trainer.engine.optim import build_optimizer

    # lr warms up then decays every step, so a resume that lost the scheduler's position shows in the loss.
    trainer = TrainerConfig(
        max_steps=8,
        micro_batch_size=ROWS // world,
        grad_accum_steps=1,
        optim=OptimConfig(lr=1e-2, weight_decay=0.1),
        schedule=ScheduleConfig(warmup_steps=2),
    )
    # Threshold 0: every parameter is partitioned and gathered for each forward, as in a real model
    # (the default keeps parameters under 100k elements whole on every rank: all of this model's).
    ds_config = build_deepspeed_config(DeepSpeedConfig(param_persistence_threshold=0), trainer, world, on_gpu=False)
    torch.manual_seed(seed)  # zero.Init broadcasts rank 0's initial weights: every world size gets these
    # tokenizer_path only satisfies ModelConfig's check (a random-init model names a tokenizer); build_model
    # does not read it.
    model = build_model(
        ModelConfig(arch=ARCH, tokenizer_path="unused"), LlamaConfig(**ARCH), trainer, ds_config, _Vocab()
    )
    optimizer, scheduler = build_optimizer(model, trainer, cpu_offload=False)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config)
    return engine


def _rows(step: int, rank: int, world: int) -> torch.Tensor:
    """This rank's share of the global batch of `step`: the same ROWS rows whatever the world size."""
    rows = torch.randint(0, ARCH["vocab_size"], (ROWS, SEQ), generator=torch.Generator().manual_seed(1000 + step))
    per_rank = ROWS // world
    return rows[rank * per_rank : (rank + 1) * per_rank]


def _loss(engine, ids: torch.Tensor, world: int):
    """(this rank's token-loss sum, its backward scale, the global supervised-token count): backward of
    sum x scale gives, after DeepSpeed averages over ranks, the gradient of the mean token loss over
    every rank's rows, as in the trainer (trainer.objectives.token.backward_scale)."""
    from trainer import distributed
    from trainer.objectives.token import backward_scale, row_loss_sums, supervised_tokens

    count = torch.tensor([float(supervised_tokens(ids))], dtype=torch.float64)
    distributed.all_reduce_sum(count)
    logits = engine(input_ids=ids, use_cache=False).logits
    return row_loss_sums(logits, ids).sum(), backward_scale(int(count), world), float(count)


def _train_step(engine, step: int, rank: int, world: int, before_step=None) -> float:
    """One optimizer step on the rows of `step`; the global mean token loss (the same on every rank)."""
    from trainer import distributed

    loss_sum, scale, count = _loss(engine, _rows(step, rank, world), world)
    engine.backward(loss_sum * scale, scale_wrt_gas=False)
    if before_step is not None:
        before_step()
    engine.step()
    total = distributed.all_reduce_sum(torch.tensor([float(loss_sum.detach())], dtype=torch.float64))
    return float(total) / count


def _local_state(engine, moments: bool = True) -> dict:
    """This rank's fp32 weight partitions and AdamW moments (none before the first step), copied."""
    from deepspeed.utils import safe_get_local_fp32_param, safe_get_local_optimizer_state

    params = [p for p in engine.module.parameters() if p.requires_grad]
    state = {"weights": [safe_get_local_fp32_param(p).clone() for p in params]}
    if moments:
        for key in ("exp_avg", "exp_avg_sq"):
            state[key] = [safe_get_local_optimizer_state(p, key).clone() for p in params]
    return state


def _same(a: dict, b: dict) -> dict:
    return {key: all(torch.equal(x, y) for x, y in zip(a[key], b[key])) for key in a}


# ---- Checkpointer on a real ZeRO-3 engine ------------------------------------------------------------


def _save_then_resume(rank, world, out):
    from trainer.checkpointing.checkpoint import Checkpointer, TrainState

    engine = _engine(world)
    checkpointer = Checkpointer(out, keep_last=2, rank=rank, world_size=world)
    fresh = checkpointer.resume(engine)  # nothing saved yet: a fresh start, not an error
    for step in (1, 2):
        _train_step(engine, step, rank, world)
    state = TrainState(
        step=2, tokens_seen=128, supervised_tokens_seen=120, skipped_steps=1, baseline={"eval/general/loss": 2.5}
    )
    checkpointer.save(engine, state)
    saved, saved_lr = _local_state(engine), engine.get_lr()
    saved_counters = (engine.global_steps, engine.global_samples, engine.lr_scheduler.last_epoch)
    problems = checkpointer.verify("step_00000002")
    rng_next = torch.rand(3)  # what the RNG gives right after the save...
    straight = [_train_step(engine, step, rank, world) for step in (3, 4)]

    other = _engine(world, seed=1)  # other weights and a fresh optimizer: only a real load makes them equal
    differed = not _same(_local_state(other, moments=False), saved)["weights"]
    torch.manual_seed(99)
    resumed_state = Checkpointer(out, keep_last=2, rank=rank, world_size=world).resume(other)
    rng_resumed = torch.rand(3)  # ... and again right after the resume
    restored = _same(_local_state(other), saved)
    counters = (saved_counters, (other.global_steps, other.global_samples, other.lr_scheduler.last_epoch))
    return {
        "counters": counters,
        "fresh": fresh,
        "problems": problems,
        "state": resumed_state,
        "saved_state": state,
        "differed": differed,
        "restored": restored,
        "lr": (saved_lr, other.get_lr()),
        "rng": torch.equal(rng_next, rng_resumed),
        "straight": straight,
        "resumed": [_train_step(other, step, rank, world) for step in (3, 4)],
    }


def test_a_resume_restores_step_weights_optimizer_schedule_and_rng_exactly(tmp_path):
    from trainer.checkpointing.checkpoint import TrainState

    ranks = run_distributed(_save_then_resume, 2, str(tmp_path))
    for rank, got in enumerate(ranks):
        assert got["fresh"] == TrainState(), rank
        assert got["problems"] == [], rank
        assert got["state"] == got["saved_state"], rank  # step, token counts, skipped steps, baseline
        assert got["differed"], "the second engine started from the same weights: the test proves nothing"
        assert got["restored"] == {"weights": True, "exp_avg": True, "exp_avg_sq": True}, rank
        assert got["lr"][0] == got["lr"][1], rank
        # DeepSpeed's own counters and the schedule's position: 2 steps of 4 rows
        assert got["counters"][0] == got["counters"][1] == (2, 8, 2), rank
        assert got["rng"], f"rank {rank}: the RNG after the resume is not the RNG after the save"
        # The same process, threads and collectives: the next steps match the straight run bit for bit.
        assert got["resumed"] == got["straight"], rank
    assert ranks[0]["straight"] == ranks[1]["straight"]  # the global loss, all-reduced
    tag = tmp_path / "checkpoints/step_00000002"
    assert (tmp_path / "checkpoints/latest").read_text() == "step_00000002"
    for name in (
        "COMPLETE",
        "trainer_state.json",
        "rng_rank0.pt",
        "rng_rank1.pt",
        "model/config.json",
        "zero_pp_rank_0_mp_rank_00_optim_states.pt",
        "zero_pp_rank_1_mp_rank_00_optim_states.pt",
    ):
        assert (tag / name).is_file(), name


def _save_prune_damage_resume(rank, world, out):
    from trainer import distributed
    from trainer.checkpointing.checkpoint import Checkpointer, CheckpointError, TrainState

    engine = _engine(world)
    checkpointer = Checkpointer(out, keep_last=2, rank=rank, world_size=world)
    for step in (1, 2, 3):
        _train_step(engine, step, rank, world)
        checkpointer.save(engine, TrainState(step=step))
    kept = sorted(p.name for p in checkpointer.dir.glob("step_*"))
    distributed.barrier()
    tag = checkpointer.dir / "step_00000003"
    if rank == 0:  # damage step 3: another rank's optimizer shard cut short, a flipped byte, a lost file
        shard = tag / "zero_pp_rank_1_mp_rank_00_optim_states.pt"
        with open(shard, "r+b") as f:
            f.truncate(shard.stat().st_size // 2)
        rng = bytearray((tag / "rng_rank0.pt").read_bytes())
        rng[-1] ^= 0xFF
        (tag / "rng_rank0.pt").write_bytes(bytes(rng))
        (tag / "trainer_state.json").unlink()
    distributed.barrier()
    problems = checkpointer.verify("step_00000003")
    try:
        Checkpointer(out, keep_last=2, rank=rank, world_size=world).resume(engine)
        refused = None
    except CheckpointError as ex:
        refused = str(ex)
    state = Checkpointer(out, keep_last=2, rank=rank, world_size=world, fallback=True).resume(engine)
    distributed.barrier()
    return {
        "kept": kept,
        "problems": problems,
        "refused": refused,
        "state": state,
        "after": sorted(
            p.name for p in checkpointer.dir.iterdir() if p.name.startswith(("step_", "damaged_", "latest"))
        ),
    }


def _resume_on_one_rank(rank, world, out):
    from trainer.checkpointing.checkpoint import Checkpointer, CheckpointError

    try:
        # The world-size check comes before anything is loaded into the engine: none is needed.
        Checkpointer(out, keep_last=2, rank=rank, world_size=world, elastic=False).resume(engine=None)
    except CheckpointError as ex:
        return str(ex)
    return None


def test_keep_last_prunes_verify_names_damage_and_fallback_resumes_the_previous(tmp_path):
    ranks = run_distributed(_save_prune_damage_resume, 2, str(tmp_path))
    tag = tmp_path / "checkpoints/step_00000003"
    shard = tag / "zero_pp_rank_1_mp_rank_00_optim_states.pt"
    for rank, got in enumerate(ranks):
        assert got["kept"] == ["step_00000002", "step_00000003"], rank  # keep_last=2 pruned step 1
        # every rank hashes a share of the files; all of them report every problem
        assert len(got["problems"]) == 3 and sorted(got["problems"]) == sorted(ranks[0]["problems"]), rank
        assert any(p.startswith(f"{shard} is ") and p.endswith("were written (truncated?)") for p in got["problems"])
        assert f"{tag / 'rng_rank0.pt'} fails its CRC-32 check (corrupted)" in got["problems"]
        assert f"{tag / 'trainer_state.json'} is missing" in got["problems"]
        assert got["refused"] is not None and f"checkpoint {tag} is damaged" in got["refused"], rank
        assert (
            "trainer.resume.fallback=true to resume from the previous complete checkpoint (step_00000002)"
            in got["refused"]
        )
        assert got["state"].step == 2, rank
        assert got["after"] == ["damaged_step_00000003", "latest", "step_00000002"], rank
    assert (tmp_path / "checkpoints/latest").read_text() == "step_00000002"

    # The same checkpoint on 1 rank with elastic resume off: refused before loading, saying how to go on.
    (message,) = run_distributed(_resume_on_one_rank, 1, str(tmp_path))
    step2 = tmp_path / "checkpoints/step_00000002"
    assert f"{step2} was saved by 2 ranks and this run has 1, and trainer.resume.elastic=false" in message
    assert f"python launch/export.py {step2} <model dir>" in message


def _train_and_save_each_step(rank, world, out, last_step):
    """A run in miniature: resume, then train and save every step up to last_step."""
    from trainer.checkpointing.checkpoint import Checkpointer

    engine = _engine(world)
    checkpointer = Checkpointer(out, keep_last=3, rank=rank, world_size=world)
    state = checkpointer.resume(engine)
    first, losses, found = state.step, {}, sorted(p.name for p in checkpointer.dir.glob("step_*"))
    while state.step < last_step:
        state.step += 1
        losses[state.step] = _train_step(engine, state.step, rank, world)
        checkpointer.save(engine, state)
    return first, found, losses


def test_a_rank_killed_inside_a_save_keeps_the_previous_checkpoint_and_the_rerun_resumes_exactly(tmp_path):
    from trainer import faults

    killed, straight = tmp_path / "killed", tmp_path / "straight"
    with pytest.raises(DistributedFailure) as failure:  # rank 1 SIGKILLs itself inside the save of step 2
        run_distributed(_train_and_save_each_step, 2, str(killed), 3, env={faults.KILL_IN_SAVE: "2:1"})
    assert failure.value.exitcodes[1] == -signal.SIGKILL
    ckpt = killed / "checkpoints"
    assert (ckpt / "latest").read_text() == "step_00000001"
    assert (ckpt / "step_00000002").is_dir() and not (ckpt / "step_00000002/COMPLETE").exists()

    (first, found, losses), _ = run_distributed(_train_and_save_each_step, 2, str(killed), 3)
    assert first == 1 and found == ["step_00000001"]  # resumed at step 1, the partial step 2 removed
    assert sorted(p.name for p in ckpt.glob("step_*")) == ["step_00000001", "step_00000002", "step_00000003"]
    assert all((ckpt / f"step_0000000{s}/COMPLETE").is_file() for s in (1, 2, 3))
    # Another process than the straight run's, but the same ranks, threads and collectives: bit for bit.
    (_, _, reference), _ = run_distributed(_train_and_save_each_step, 2, str(straight), 3)
    assert losses == {s: reference[s] for s in (2, 3)}


# ---- EWC on ZeRO-3 shards ------------------------------------------------------------------------------

LAM = 50.0
FISHER_BATCHES = 2


def _reference_loss(engine, batch, device):
    """EWC.start's loss_fn: the mean token loss of one reference batch over every rank."""
    world = torch.distributed.get_world_size()
    loss_sum, scale, _ = _loss(engine, batch["input_ids"], world)
    return loss_sum * scale


def _ewc_shards(rank, world, out):
    """Fisher and anchor from FISHER_BATCHES reference batches; one step with EWC's gradient; on 2 ranks
    also the state through the checkpointer's extras."""
    from deepspeed.utils import safe_get_local_fp32_param, safe_get_local_grad

    from trainer import distributed
    from trainer.checkpointing.checkpoint import Checkpointer, TrainState
    from trainer.engine.model import count_parameters
    from trainer.forgetting.ewc import EWC

    engine = _engine(world)
    ewc = EWC(engine, lam=LAM)
    batches = [{"input_ids": _rows(100 + n, rank, world)} for n in range(FISHER_BATCHES)]
    ewc.start(engine, batches, _reference_loss, engine.device)
    got = {
        "fisher": [f.clone() for f in ewc.fisher],
        "anchor": [a.clone() for a in ewc.anchor],
        "numel": [p.ds_numel for p in ewc.params],
        "local": ewc.local_numel(),
        "total": count_parameters(engine.module),
    }

    _train_step(engine, 1, rank, world, before_step=ewc.before_step)  # θ moves away from θ*
    checks = {}

    def before_step():
        grads = [safe_get_local_grad(p).clone() for p in ewc.params]
        zero = EWC(engine, lam=0.0)
        zero.load_state_dict(ewc.state_dict())
        zero.before_step()
        checks["lam0_untouched"] = all(torch.equal(g, safe_get_local_grad(p)) for g, p in zip(grads, ewc.params))
        penalty = ewc.before_step()
        # λ·F⊙(θ−θ*) on this rank's partition, written out (ewc_math's own tests check its formula)
        expected = [
            g + LAM * f * (safe_get_local_fp32_param(p) - a)
            for g, p, a, f in zip(grads, ewc.params, ewc.anchor, ewc.fisher)
        ]
        checks["grad_added"] = all(
            torch.allclose(safe_get_local_grad(p), e, rtol=1e-6, atol=0) for p, e in zip(ewc.params, expected)
        )
        checks["penalty"] = float(distributed.all_reduce_sum(torch.tensor([penalty], dtype=torch.float64)))

    _train_step(engine, 2, rank, world, before_step=before_step)
    got.update(checks)

    if world > 1:  # through the checkpointer: saved as ewc_rank<R>.pt, loaded into an empty EWC
        Checkpointer(out, keep_last=1, rank=rank, world_size=world, extras={"ewc": ewc}).save(
            engine, TrainState(step=2)
        )
        again = EWC(engine, lam=LAM)
        Checkpointer(out, keep_last=1, rank=rank, world_size=world, extras={"ewc": again}).resume(engine)
        got["round_trip"] = again.ready and all(
            torch.equal(x, y) for x, y in zip(again.fisher + again.anchor, ewc.fisher + ewc.anchor)
        )
    return got


def _lambda_zero(rank, world):
    """Three steps without EWC, and three from the same start with EWC at lam=0 (its Fisher pass first,
    its before_step in every step): the losses. The Fisher pass must leave no trace in training."""
    from trainer.forgetting.ewc import EWC

    plain = _engine(world)
    without = [_train_step(plain, step, rank, world) for step in (1, 2, 3)]
    engine = _engine(world)
    ewc = EWC(engine, lam=0.0)
    ewc.start(
        engine,
        [{"input_ids": _rows(100 + n, rank, world)} for n in range(FISHER_BATCHES)],
        _reference_loss,
        engine.device,
    )
    return without, [_train_step(engine, step, rank, world, before_step=ewc.before_step) for step in (1, 2, 3)]


def test_ewc_with_lambda_zero_trains_exactly_as_without_it():
    for without, with_ewc in run_distributed(_lambda_zero, 2):
        assert with_ewc == without  # one process, the same collectives: bit for bit


def _unshard(ranks, key):
    """Each parameter's flat tensor from the ranks' partitions (rank order; the last may be padded)."""
    return [torch.cat([r[key][i] for r in ranks])[:n] for i, n in enumerate(ranks[0]["numel"])]


def test_ewc_shards_sum_to_the_model_and_equal_an_unsharded_rank(tmp_path):
    two = run_distributed(_ewc_shards, 2, str(tmp_path))
    (one,) = run_distributed(_ewc_shards, 1, str(tmp_path / "one"))

    # Each rank keeps only its partition: about half each, the whole model between them.
    total = one["total"]
    assert one["local"] == total == sum(one["numel"])
    assert two[0]["local"] + two[1]["local"] == total
    assert all(0.4 * total < r["local"] < 0.6 * total for r in two)

    # The anchor is θ at the start on every layout (the same initial weights): equal exactly.
    for mine, whole in zip(_unshard(two, "anchor"), one["anchor"]):
        assert torch.equal(mine, whole)
    # The Fisher: the same squared gradients, but 2 ranks add the rows' gradients in another order than
    # 1 rank (float32, a few ulp apart), squared and normalised to mean 1: 1e-4 relative is ample.
    sharded, whole = torch.cat(_unshard(two, "fisher")), torch.cat(one["fisher"])
    assert torch.allclose(sharded, whole, rtol=1e-4, atol=1e-6), (sharded - whole).abs().max()
    assert abs(float(whole.double().mean()) - 1.0) < 1e-5  # normalised over all ranks' elements
    assert float(whole.min()) >= 0.0 and float(whole.max()) > 0.0

    for got in two + [one]:
        assert got["lam0_untouched"], "EWC with lam=0 changed a gradient"
        assert got["grad_added"], "EWC did not add lam * F * (theta - anchor) to the local gradient partition"
        assert got["penalty"] > 0.0
    assert two[0]["penalty"] == two[1]["penalty"]  # all-reduced
    assert abs(two[0]["penalty"] - one["penalty"]) <= 1e-4 * one["penalty"]
    assert two[0]["round_trip"] and two[1]["round_trip"]
    assert all((tmp_path / f"checkpoints/step_00000002/ewc_rank{r}.pt").is_file() for r in (0, 1))


def _fisher_labels(rank, world):
    """The trainer's own reference loss (trainer/forgetting/ewc.py: reference_loss) on the data's labels and on labels
    sampled from the model, seeded as the loop seeds them: the three Fishers, and whether the weights,
    the optimizer and a later step are as if no Fisher had been estimated."""
    import functools

    from trainer.forgetting.ewc import EWC
    from trainer.forgetting.ewc import reference_loss as trainer_reference_loss

    def batches():
        out = []
        for n in range(FISHER_BATCHES):
            ids = _rows(100 + n, rank, world)
            out.append({"input_ids": ids, "labels": ids, "position_ids": torch.arange(SEQ).expand_as(ids)})
        return out

    engine = _engine(world)
    fishers = {}
    for name, seed in (("data", None), ("sampled", 7), ("sampled_again", 7), ("other_seed", 8)):
        ewc = EWC(engine, lam=LAM)
        loss_fn = (
            trainer_reference_loss
            if seed is None
            else functools.partial(
                trainer_reference_loss, sample_with=torch.Generator().manual_seed(seed * 1_000_003 + rank)
            )
        )
        ewc.start(engine, batches(), loss_fn, engine.device)
        fishers[name] = torch.cat([f.flatten() for f in ewc.fisher])
    plain = _engine(world)
    return fishers, _train_step(engine, 1, rank, world), _train_step(plain, 1, rank, world)


def test_ewc_fisher_on_sampled_labels_is_seeded_normalised_and_leaves_training_untouched():
    for fishers, after_four_fishers, plain in run_distributed(_fisher_labels, 2):
        assert after_four_fishers == plain  # estimating Fishers moves no weight and no optimizer state
        assert torch.equal(fishers["sampled"], fishers["sampled_again"])  # the seed fixes the draws
        assert not torch.equal(fishers["sampled"], fishers["other_seed"])
        data, sampled = fishers["data"], fishers["sampled"]
        assert not torch.allclose(data, sampled, rtol=0.1)  # another estimate, not the data's squared gradient
        assert float(sampled.min()) >= 0.0 and float(sampled.max()) > 0.0
        # Both are normalised to mean 1 over both ranks' elements: each rank's part is near it.
        assert 0.5 < float(sampled.double().mean()) < 2.0 and 0.5 < float(data.double().mean()) < 2.0


# ---- activation checkpointing of a pretrained model ------------------------------------------------


def _layer_forwards_per_step(rank, world, out, checkpointing):
    """Attention forward calls in one training step of a model loaded with from_pretrained (which hands
    it back in eval mode): 2 per layer with activation checkpointing (the recompute in backward), 1
    without. (Counted inside the layer: transformers checkpoints a layer's forward, not its hooks.)"""
    import deepspeed
    from transformers import LlamaConfig, LlamaForCausalLM

    from trainer.config import DeepSpeedConfig, ModelConfig, TrainerConfig
    from trainer.engine.deepspeed_config import build_deepspeed_config
    from trainer.engine.model import build_model
    from trainer.engine.optim import build_optimizer

    if rank == 0:
        torch.manual_seed(0)
        LlamaForCausalLM(LlamaConfig(**ARCH)).save_pretrained(out)
    torch.distributed.barrier()
    trainer = TrainerConfig(micro_batch_size=ROWS // world, grad_accum_steps=1, activation_checkpointing=checkpointing)
    ds_config = build_deepspeed_config(DeepSpeedConfig(), trainer, world, on_gpu=False)
    model = build_model(ModelConfig(name_or_path=out), LlamaConfig.from_pretrained(out), trainer, ds_config, _Vocab())
    optimizer, scheduler = build_optimizer(model, trainer, cpu_offload=False)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config)
    calls = []
    for layer in engine.module.model.layers:
        layer.self_attn.register_forward_hook(lambda *args: calls.append(1))
    loss_sum, scale, _ = _loss(engine, _rows(1, rank, world), world)
    engine.backward(loss_sum * scale, scale_wrt_gas=False)
    engine.step()
    return engine.module.training, len(calls)


@pytest.mark.parametrize("checkpointing,per_layer", [("none", 1), ("full", 2)])
def test_a_pretrained_model_trains_in_train_mode_with_its_activation_checkpointing(tmp_path, checkpointing, per_layer):
    for training, forwards in run_distributed(_layer_forwards_per_step, 2, str(tmp_path), checkpointing):
        assert training, "the model trains in eval mode (from_pretrained's): no activation checkpointing, no dropout"
        assert forwards == per_layer * ARCH["num_hidden_layers"], forwards
