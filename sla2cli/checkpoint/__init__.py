"""SLA2 checkpoints: the folder format (`format`), writing and opening it (`storage`), the model card (`card`)."""
