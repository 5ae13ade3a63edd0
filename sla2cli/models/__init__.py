"""Model integration: the models SLA2 attention is put into, including the small embedded default model."""
