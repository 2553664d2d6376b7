"""``python -m loadtests.bench``: ringserve against the common FastAPI pattern and the ceiling."""
