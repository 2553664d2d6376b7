"""The contract between the HTTP workers (frontend) and the engine process.

Imports nothing from ``frontend`` or ``engine``; both import from here.
"""
