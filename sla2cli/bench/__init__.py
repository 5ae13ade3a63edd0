"""`sla2 bench`: SLA2 against FlashAttention2 and its peers, verified first, then timed.

Kernel mode (`kernel_mode`) times one attention call per provider (`providers`), shape, sparsity and
mode; model mode (`model_mode`) times one transformer forward or training step with dense attention and
with SLA2. `output` and `plot` show and save the rows (`records`).
"""
