"""Attaching to a Ray cluster (`attach`) and checking cluster files before `ray up` (`check`)."""
