"""Torture harness for coherent-volume: concurrent agents, injected faults, recorded histories.

The harness drives a volume through its faces (Python API in threads and processes, shell
processes in a real mount), records every commit attempt, and hands the recorded history to
`checker`, which verifies it without importing anything from `coherent_volume`.
"""
