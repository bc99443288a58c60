"""What a stage minimises. `token` (the mean token loss of pretrain/sft/instruct) and `preference`
(DPO/IPO/SimPO on pairs) are objectives; `head` turns a batch into per-token losses through the LM
head (`chunked`: a chunk of tokens at a time); `reference` computes a preference stage's reference
log-probs once. The loop sees one `Objective` (trainer/components.py), built by `build_objective`."""
