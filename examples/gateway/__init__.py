"""A Starlette gateway that streams a run to the browser: see :mod:`.app`."""
