"""Sharded training of HART's transformer and diffusion head (see ``loop.train``)."""
