"""`sla2 demo`'s computation: SLA2 against dense attention on a synthetic video-like attention pattern.

`pattern` builds Q, K, V whose attention is local in space and time, `measure` runs dense attention and
SLA2 (its router, and random key blocks with the same budget) on them, `output` renders the table and
writes the CSV.
"""
