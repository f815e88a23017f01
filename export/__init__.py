"""omniace.export: see the README for what lands here."""
