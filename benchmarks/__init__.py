"""Speed and memory measurements of trekeys, as ratios against reference tools."""
