"""Recipe data files, one json document per model family, installed as the `sla2cli.recipes` package."""
