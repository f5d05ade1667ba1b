"""Dagster resources and IO managers of Quiver."""
