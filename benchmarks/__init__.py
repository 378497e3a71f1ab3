"""Performance benchmarks: ``make bench`` (``python -m benchmarks.run``); see README.md here."""
