"""Constants of the fake user project (a second-level local module: imported by textutil)."""

PREFIX = "Q: "
BANNED_WORDS = {"spam", "eggs"}
