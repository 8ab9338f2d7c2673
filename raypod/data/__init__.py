"""Data: corpus preparation, sample sources and the seeded sample order."""
