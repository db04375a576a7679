//! Closed sets of names — config values and flag values such as `data.order` or `--quantize` —
//! declared once as an enum whose variants carry their spelling. The spelling serves the
//! config files (serde), the flags (`FromStr`) and the errors, which list the choices.

/// "a, b or c".
pub fn list(names: &[&str]) -> String {
    match names.split_last() {
        Some((last, rest)) if !rest.is_empty() => format!("{} or {last}", rest.join(", ")),
        _ => names.join(""),
    }
}

/// Declares `pub enum $name { Variant = "spelling", … }` with `NAMES`, `name()`, `FromStr`,
/// `Display` and serde as those spellings.
macro_rules! named_enum {
    (
        $(#[$meta:meta])*
        pub enum $name:ident {
            $($(#[$vmeta:meta])* $variant:ident = $text:literal,)+
        }
    ) => {
        $(#[$meta])*
        #[derive(Clone, Copy, Debug, PartialEq, Eq)]
        pub enum $name {
            $($(#[$vmeta])* $variant,)+
        }

        impl $name {
            /// Every spelling, in declaration order.
            pub const NAMES: &'static [&'static str] = &[$($text),+];

            pub fn name(self) -> &'static str {
                match self {
                    $(Self::$variant => $text,)+
                }
            }
        }

        impl std::str::FromStr for $name {
            type Err = String;

            fn from_str(s: &str) -> Result<Self, String> {
                match s {
                    $($text => Ok(Self::$variant),)+
                    other => Err(format!(
                        "{other:?} is not one of {}",
                        $crate::choice::list(Self::NAMES)
                    )),
                }
            }
        }

        impl std::fmt::Display for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(self.name())
            }
        }

        impl serde::Serialize for $name {
            fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.serialize_str(self.name())
            }
        }

        impl<'de> serde::Deserialize<'de> for $name {
            fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let s = <String as serde::Deserialize>::deserialize(d)?;
                s.parse().map_err(<D::Error as serde::de::Error>::custom)
            }
        }
    };
}
pub(crate) use named_enum;

#[cfg(test)]
mod tests {
    named_enum! {
        /// A test set.
        pub enum Fruit {
            Apple = "apple",
            Blood = "blood_orange",
        }
    }

    #[test]
    fn spellings_round_trip_and_errors_list_the_choices() {
        assert_eq!("blood_orange".parse::<Fruit>(), Ok(Fruit::Blood));
        assert_eq!(Fruit::Apple.to_string(), "apple");
        let err = "pear".parse::<Fruit>().unwrap_err();
        assert_eq!(err, "\"pear\" is not one of apple or blood_orange");
        let v: Fruit = toml::Value::String("apple".into()).try_into().unwrap();
        assert_eq!(v, Fruit::Apple);
        assert_eq!(
            toml::Value::try_from(Fruit::Blood).unwrap().as_str(),
            Some("blood_orange")
        );
    }
}
