"""Placeholder; replaced below."""


def quiet_start():
  pass
