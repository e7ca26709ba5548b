"""The Accelerate pre-training loop both stages share, and what it needs around it.

`loop` (the named steps of a run), `arguments` (its flags), `log` (what a run counts and prints), `checkpointing`
(atomic, verified checkpoints and the output-folder lock), `optimization` (AdamW groups, layer decay, the skip of a
non-finite update) and `host_memory` (fewer page faults per CPU step).
"""
