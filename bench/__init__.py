"""omniace.bench: see the README for what lands here."""
