"""The simulated teacher: a loopback HTTP stand-in for a real teacher, with a small arithmetic world."""

from agentkd.teachers.sim.server import Generation, Responder, SimHandle, SimTeacher, serve_forever, sim_in_thread

__all__ = ["Generation", "Responder", "SimHandle", "SimTeacher", "serve_forever", "sim_in_thread"]
