"""The built-in plugins (imported as ``squeezelang_plugins``), registered through entry points
exactly like a third-party distribution's."""
