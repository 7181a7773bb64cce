"""The engine: capture, fusion methods, preprocessing, geometry and whole-volume runs.

No MRML, no files, no processes; modules here import only each other and ``AttentionMapLib.errors``.
"""
