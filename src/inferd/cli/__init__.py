"""The ``inferd`` command line: one module per verb."""
