"""The web dashboard (/ui)."""
