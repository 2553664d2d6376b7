"""The HTTP worker processes: parse, decode, resize into the ring, ask the engine, answer."""
