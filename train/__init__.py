"""omniace.train: see the README for what lands here."""
