"""`sla2 report`: per-layer, per-head sparsity and accuracy of SLA2 attention against full attention.

metrics (pure functions of q, k, v), capture (hooks on converted layers), inputs (sample clips per model
family), runner (runs the model and averages), summary (per layer and model), output (table and files),
sampling (dense beside SLA2 samples for the GIF), loading (which model the command runs on).
"""
