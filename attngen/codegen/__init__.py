"""Code generation: score modifiers, kernel signatures, the Jinja templates' rendering, NVRTC compilation and its cache."""
