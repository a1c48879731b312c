"""Word lists for the synthetic tasks: needle keys ("adjective-noun") and list words (CWE).

Our own short lists of common English words (RULER draws from the `wonderwords` package,
which is not a dependency here). 120 adjectives x 160 nouns give 19,200 distinct keys;
CWE draws plain words first, then "adjective-noun" pairs when a list needs more.
"""

from __future__ import annotations

ADJECTIVES = tuple("""
able absent active agile amber ancient angry anxious bitter black blue bold brave brief
bright brisk broad broken busy calm careful cheap cheerful chilly clean clever cloudy coarse
cold common cool crisp cruel curious damp dark deep dense dizzy dry dusty eager early
elegant empty endless faint fancy fast fierce flat fluffy fond fragile fresh friendly
frosty funny gentle giant glad golden grand gray great green grumpy happy harsh heavy
hidden hollow honest huge humble hungry icy idle jolly keen kind large lazy little lively
lonely loud lucky mellow merry mighty misty modern narrow neat nervous noble odd old
orange pale patient plain polite proud purple quick quiet rapid rare red rich rough
round royal rusty sad salty sharp shiny short silent silly simple sleepy slow small
smooth soft solid sour spicy steady stormy strange strong sunny sweet swift tall tame
tender thick thin tidy tiny tough violet warm wild wise witty young
""".split())

NOUNS = tuple("""
acorn actor airport anchor angle animal apple arch arrow artist attic autumn badge bakery
balloon banana banner barn basket beach beard bell bench bicycle blanket boat bottle
bridge brush bucket butter button cabin cactus camera candle canoe canyon carpet castle
cat cellar chair cherry chimney circle city cliff clock cloud coast coffee comet cookie
copper cottage cousin cradle crane crayon desert diamond dinner doctor dolphin door
dragon drawer drum eagle engine falcon farmer feather fence fiddle field flag flute
forest fountain fox garden gate giraffe glacier glove goat guitar hammer harbor hat
helmet hill honey horse island jacket jungle kettle kitten ladder lake lamp lantern
lemon letter library lion lizard magnet mango map meadow mirror monkey moon mountain
needle nest ocean office orchard otter owl painter palace panda parrot peach pencil
pepper piano pigeon pillow pirate planet pocket pond potato puzzle rabbit radio river
robot rocket saddle sailor salmon sandwich scarf school shadow shell ship shovel singer
spider spoon squirrel stable station statue stone storm street sugar summer swan table
teacher temple tiger tomato tower tractor train tree tunnel turtle umbrella valley
violin wagon wall window winter wizard wolf
""".split())

VERBS = tuple("""
admire allow answer appear arrive bake balance bathe blink boil borrow bounce breathe
build calculate camp carry carve chase cheer chew climb collect cough crawl dance
deliver dig divide drift dream drink earn escape explain fetch fill float fold gather
giggle glow grab greet guard hammer hop hunt hurry imagine invite jog juggle kneel knit
laugh launch listen march melt mend nod obey offer order pack paint paddle plant play
polish pour pray pretend print pull punch push quack race rescue rinse roar rub sail
scatter scream search shave shiver sing skip sneeze sniff spark spill sprout stare
stir swim tickle travel tumble unlock vanish wander wash whisper whistle wiggle wink
wobble wonder yawn yell zoom
""".split())


def plain_words() -> list:
    """Distinct single words, in a fixed order."""
    return sorted(set(ADJECTIVES) | set(NOUNS) | set(VERBS))


def key_words() -> list:
    """Distinct "adjective-noun" keys, in a fixed order."""
    return [f"{a}-{n}" for a in ADJECTIVES for n in NOUNS]
