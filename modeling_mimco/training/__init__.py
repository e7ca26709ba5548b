"""The Accelerate pre-training loop both stages share, and what it needs around it.

`loop` (the named steps of a run), `arguments` (its flags), `log` (what a run counts and prints), `checkpointing`
(atomic, verified checkpoints and the output-folder lock), `optimization` (AdamW groups, layer decay, the skip of a
non-finite update), `host_memory` (fewer page faults per CPU step), `failures` (the one line a process prints when
another one of the run died or hung past `--ddp_timeout`) and `orphans` (SIGTERM to a process whose launcher died).
"""
