"""Embedded tasks for ``lightning train`` (each module: ``dataset()`` and an ``agent``)."""
