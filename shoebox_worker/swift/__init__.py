"""OpenStack Swift, below both ends: what the swift step writes
(:mod:`shoebox_worker.ship.swift`) and what the readers look for
(:mod:`shoebox_worker.tools.sources`) meet here."""
