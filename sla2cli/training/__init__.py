"""Training of converted models: stage 1, calibration of the router and alpha per layer (docs/method.md, section 8)."""
