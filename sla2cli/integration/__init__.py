"""Model integration: recipes (what to convert per model family), the SLA2 attention processors of each
family, and conversion, which attaches them to a diffusers transformer."""
