"""Reading what a lab guest recorded: one part of its JSON, with the guest's
own output when it did not get there."""


def part(dev: dict, name: str):
    value = dev.get(name)
    assert value is not None, f"the guest did not reach {name}: {dev['_out'][-2000:]}"
    assert "exception" not in value, f"{name} failed in the guest:\n{value['traceback']}"
    return value
