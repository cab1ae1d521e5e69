"""Launcher support: environment detection, rendezvous, job scripts and stop signals."""
