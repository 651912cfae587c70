"""The simulated teacher: a loopback HTTP stand-in for a real teacher, with a small arithmetic world."""
