"""Transitional: the package is gone (runs, models.build, models.conversion, representations hold its parts);
what is left serves cli.py until the lead re-points it at merge, then this package is deleted."""
