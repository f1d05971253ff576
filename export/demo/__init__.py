"""The embedded demo model: SmolLM2-135M-Instruct turned into a MiniMind2-style MoE
(``moechat demo build``)."""
