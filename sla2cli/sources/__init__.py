"""Where base models come from: the MODEL argument (`spec`), the Hub (`hub`), local folders (`folders`), finding
and building a model's components (`locate`, `components`), and recipe architectures with random weights."""
