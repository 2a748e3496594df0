"""Structured outputs as a user of the official client meets them: `client.chat.completions.parse` with
a pydantic model sends OpenAI's strict json_schema (openai's `to_strict_json_schema` of pydantic's
schema: `$defs`/`$ref`, `additionalProperties: false`, every field required, defaults dropped), and
every one of 20 draws at temperature 1.0 comes back as a parsed object that pydantic validated, the
JSON closed before max_tokens. Regex and choice constraints hold on every one of 20 draws too. The
references: pydantic's own validation, `re.fullmatch`, the list of choices.

The tiny SmolLM2 at temperature 1.0 writes whatever the grammar allows: an unbounded string or
integer can run to max_tokens (a `length` finish, which `parse` raises on), so strings carry
maxLength, integers maximum and floats multipleOf (pydantic's max_length, le, multiple_of) as a user
bounding a small model would.
Lists too: an unbounded list of 8-character labels closed on 19 of 20 draws and ran to max_tokens on
one (2026-12-03; others wrote 11 labels), so Basket.labels carries maxItems."""

import re
from concurrent.futures import ThreadPoolExecutor
from enum import Enum
from typing import Annotated, Literal

import pytest
from helpers import NAME
from pydantic import BaseModel, Field

NUM_SAMPLES = 20
N = 10  # choices per request: two requests at once make the 20 draws, batched in the engine's steps
MAX_TOKENS = 120


class Address(BaseModel):
    city: str = Field(max_length=16)
    zip_code: str = Field(pattern=r"^[0-9]{5}$")


class Person(BaseModel):
    """Nested objects: a `$ref` into `$defs`."""
    name: str = Field(max_length=16)
    address: Address


class Color(str, Enum):
    red = "red"
    green = "green"
    blue = "blue"


class Shirt(BaseModel):
    """Enums: a Python Enum (a `$ref` to an enum) and a Literal (an inline enum)."""
    color: Color
    size: Literal["S", "M", "L", "XL"]


class Basket(BaseModel):
    """Arrays bounded (minItems/maxItems, pydantic's min_length/max_length) of enums, bounded integers
    and short strings. Integers, strings and lists without bounds are what a user bounds: at
    temperature 1.0 the model ran one integer's digits, one string and one list to max_tokens."""
    fruits: list[Literal["apple", "pear", "plum"]] = Field(min_length=1, max_length=4)
    counts: list[Annotated[int, Field(ge=0, le=99)]] = Field(max_length=5)
    labels: list[Annotated[str, Field(max_length=8)]] = Field(max_length=6)


class Reading(BaseModel):
    """Numbers with bounds: integers and floats, minimum and maximum, negative ones too; the floats'
    decimals bounded by multipleOf (a float with only a range ran 110 digits to max_tokens on one draw)."""
    celsius: float = Field(ge=-40, le=50, multiple_of=0.1)
    humidity: int = Field(ge=0, le=100)
    pressure: float = Field(ge=0.5, le=1.5, multiple_of=0.001)
    floor: int = Field(ge=-3, le=3)


class Profile(BaseModel):
    """Optional fields: `X | None`, which strict mode keeps required with null allowed, with and
    without a default (openai's strict schema drops the default)."""
    nickname: str | None = Field(max_length=16)
    age: int | None = Field(ge=0, le=120)
    address: Address | None = None


SCHEMAS = {Person: "Describe a person and where they live.",
           Shirt: "Describe a shirt for sale.",
           Basket: "Describe a basket from the market.",
           Reading: "Report a weather reading.",
           Profile: "Describe a user profile."}


def draws(create, **kwargs) -> list:
    """NUM_SAMPLES sampled choices at temperature 1.0: requests of N choices sent at once (so the
    engine's steps stay full), seeds all different."""
    def request(seed):
        return create(model=NAME, n=N, temperature=1.0, seed=seed, **kwargs).choices

    with ThreadPoolExecutor(NUM_SAMPLES // N) as pool:
        return [choice for choices in pool.map(request, range(0, NUM_SAMPLES, N)) for choice in choices]


@pytest.mark.parametrize("model", SCHEMAS, ids=lambda model: model.__name__)
def test_parse_gives_a_validated_object_on_every_draw(served, model):
    choices = draws(served.client.chat.completions.parse, messages=[{"role": "user", "content": SCHEMAS[model]}],
                    response_format=model, max_tokens=MAX_TOKENS)  # a "length" choice raises in parse
    assert len(choices) == NUM_SAMPLES
    for choice in choices:
        assert choice.finish_reason == "stop", choice.message.content
        assert isinstance(choice.message.parsed, model)  # the client's model_validate_json passed
        assert model.model_validate_json(choice.message.content) == choice.message.parsed
    assert len({choice.message.content for choice in choices}) > 1  # sampled, not one answer repeated


PHONE = r"\(\d{3}\) \d{3}-\d{4}"
CITIES = ["Lyon", "Paris", "Nice", "Saint-Étienne"]


def test_regex_holds_on_every_draw(served):
    choices = draws(served.client.completions.create, prompt="Call me at", max_tokens=20,
                    extra_body={"structured_outputs": {"regex": PHONE}})
    assert len(choices) == NUM_SAMPLES
    for choice in choices:
        assert re.fullmatch(PHONE, choice.text), choice.text
        assert choice.finish_reason == "stop"
    assert len({choice.text for choice in choices}) > 1


def test_choice_holds_on_every_draw(served):
    choices = draws(served.client.chat.completions.create, max_tokens=10,
                    messages=[{"role": "user", "content": "Name a French city."}],
                    extra_body={"structured_outputs": {"choice": CITIES}})
    assert len(choices) == NUM_SAMPLES
    for choice in choices:
        assert choice.message.content in CITIES
        assert choice.finish_reason == "stop"
    assert len({choice.message.content for choice in choices}) > 1
