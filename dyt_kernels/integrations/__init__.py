"""Adapters for third-party model libraries; each module imports its library only when used."""
