"""The parts of `tfopt.export`: input handling, export forms, checks, the atomic write.

Private: `tfopt.exporting` (the `export` function) and `tfopt.litert` (conversion
and the interpreter) are the public faces.
"""
