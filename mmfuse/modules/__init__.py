"""Plain nn.Modules: encoders, fusion, conditioning, decoder. No Lightning, no Hydra."""
