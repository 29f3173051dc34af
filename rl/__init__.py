"""agentloop rl: the training half of the learning loop.

Feedback rows become LoRA adapters here: DPO on preference pairs (rl/dpo.py),
KTO on thumbs up/down (rl/kto.py), sharing data/model/metrics code in
rl/common.py; a run is its own process (rl/job.py) and its only output is a
new `candidate` version in the numbered adapter registry (rl/registry.py),
which the gate later verifies and promotes to `live`.

Invariant: nothing here imports fastapi or serve/http/app.py, and importing the
package (or rl.registry / rl.job) does not import torch.
"""
