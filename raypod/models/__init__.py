"""Reference models shipped with raypod."""
