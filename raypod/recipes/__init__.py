"""Recipes shipped with raypod."""
