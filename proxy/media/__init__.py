"""Media parts (images, videos): their kinds, header checks, pixel budgets and the guarded fetch of
remote URLs.
"""
