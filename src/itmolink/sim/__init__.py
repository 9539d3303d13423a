"""Scenario simulation: real nodes played through a 2021-2030 schedule (``itmolink simulate``)."""
