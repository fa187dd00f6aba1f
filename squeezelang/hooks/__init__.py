"""The plugin host: hook specifications, the registries they fill, and the manager."""
