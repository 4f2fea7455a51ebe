"""peftbench's built-in plugins (import name ``peftbench_plugins``).

Each module is registered through the ``peftbench`` entry-point group and uses only the
public API (``import peftbench``), exactly as a third-party plugin would.
"""
